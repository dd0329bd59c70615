"""KernelAdapter against the real kernel, inside network namespaces made for each test.

Topology (fresh for every test, torn down in a `finally`):

    [ POP namespace ]  bb0 ==veth== bb1  [ backbone namespace ]
      10.0.0.1/30, 10.0.1.1/30             10.0.0.2/30, 10.0.1.2/30
      2001:db8:1::1/64, 2001:db8:2::1/64   2001:db8:1::2/64, 2001:db8:2::2/64
      lo up (VIPs go here)

What the adapter did is checked with iproute2 (`ip -N -j route show table all`) and, for
address marks, with a raw netlink dump: never with the adapter's own reader.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import ip_address, ip_interface, ip_network

import pytest

from controller.kernel.diff import (
    AddressDiff,
    KernelError,
    KernelRoute,
    KernelSyncError,
    RouteDiff,
    RouteReplace,
)
from controller.kernel.netlink import KernelAdapter

pytestmark = pytest.mark.lab

PROTO = 99
VIP_A, VIP_B, VIP_C = "198.51.100.10/32", "198.51.100.11/32", "198.51.100.12/32"
VIP6_A, VIP6_B = "2001:db8:ff::10/128", "2001:db8:ff::11/128"
_counter = itertools.count()


def route(prefix: str, next_hop: str) -> KernelRoute:
    return KernelRoute(ip_network(prefix), ip_address(next_hop))


def sh(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


@dataclass(frozen=True)
class Pop:
    ns: str  # the POP: where the adapter works
    backbone: str  # the next hops live here

    def ip(self, *args: str) -> str:
        return sh("ip", "-n", self.ns, *args)

    def routes(self) -> set[tuple[int, str, str | None, int, int]]:
        """Every unicast route in every table: (table, dst, gateway, protocol, metric)."""
        out: set[tuple[int, str, str | None, int, int]] = set()
        for family in ("-4", "-6"):
            shown = sh("ip", "-N", "-j", "-n", self.ns, family, "route", "show", "table", "all")
            for r in json.loads(shown):
                if r.get("type", "1") != "1":
                    continue
                out.add((
                    int(r.get("table", 254)),
                    str(ip_network(r["dst"])),
                    r.get("gateway"),
                    int(r["protocol"]),
                    int(r.get("metric", 0)),
                ))
        return out

    def ours(self) -> set[tuple[str, str, int]]:
        """Our routes as iproute2 sees them: (dst, gateway, metric) with proto 99, table main."""
        return {(dst, gw, metric) for table, dst, gw, proto, metric in self.routes()
                if proto == PROTO and table == 254 and gw is not None}

    def lo_addresses(self) -> dict[str, int]:
        """Every address on lo -> its IFA_PROTO, from a raw netlink dump in the namespace."""
        index = json.loads(self.ip("-j", "link", "show", "dev", "lo"))[0]["ifindex"]
        dump = json.loads(sh("ip", "netns", "exec", self.ns, sys.executable, "-c", _RAW_ADDR_DUMP))
        return {f"{a['address']}/{a['prefixlen']}": a["proto"] for a in dump if a["index"] == index}


# Independent of pyroute2: RTM_GETADDR over a plain netlink socket, IFA_PROTO is attr 11.
_RAW_ADDR_DUMP = r"""
import json, socket, struct
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
s.send(struct.pack("=LHHLL", 24, 22, 0x301, 1, 0) + struct.pack("=BBBBI", 0, 0, 0, 0, 0))
out, done = [], False
while not done:
    data, off = s.recv(1 << 16), 0
    while off < len(data):
        length, kind = struct.unpack_from("=LH", data, off)
        if kind == 3:
            done = True
            break
        if kind == 2:
            raise SystemExit("netlink error")
        if kind == 20:
            family, plen, _, _, index = struct.unpack_from("=BBBBI", data, off + 16)
            attrs, a = {}, off + 24
            while a < off + length:
                alen, atype = struct.unpack_from("=HH", data, a)
                attrs[atype] = data[a + 4:a + alen]
                a += (alen + 3) & ~3
            raw = attrs.get(2) or attrs[1]
            out.append({"index": index, "address": socket.inet_ntop(family, raw),
                        "prefixlen": plen, "proto": attrs[11][0] if 11 in attrs else 0})
        off += (length + 3) & ~3
print(json.dumps(out))
"""


@pytest.fixture
def pop() -> Iterator[Pop]:
    tag = f"{os.getpid() % 100000}-{next(_counter)}"
    p = Pop(ns=f"t-kern-{tag}-p", backbone=f"t-kern-{tag}-b")
    created: list[str] = []
    try:
        for ns in (p.ns, p.backbone):
            sh("ip", "netns", "add", ns)
            created.append(ns)
        sh("ip", "link", "add", "bb0", "netns", p.ns,
           "type", "veth", "peer", "name", "bb1", "netns", p.backbone)
        for ns, dev, host in ((p.ns, "bb0", "1"), (p.backbone, "bb1", "2")):
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "addr", "add", f"10.0.0.{host}/30", "dev", dev)
            sh("ip", "-n", ns, "addr", "add", f"10.0.1.{host}/30", "dev", dev)
            sh("ip", "-n", ns, "addr", "add", f"2001:db8:1::{host}/64", "dev", dev, "nodad")
            sh("ip", "-n", ns, "addr", "add", f"2001:db8:2::{host}/64", "dev", dev, "nodad")
        yield p
    finally:
        for ns in reversed(created):
            subprocess.run(["ip", "netns", "del", ns], check=False)


@pytest.fixture
def kernel(pop: Pop) -> Iterator[KernelAdapter]:
    adapter = KernelAdapter(protocol=PROTO, netns=pop.ns)
    try:
        yield adapter
    finally:
        adapter.close()


# --- routes ---------------------------------------------------------------------------------
def test_sync_installs_vip_routes_marked_with_our_protocol(pop: Pop, kernel: KernelAdapter) -> None:
    diff = kernel.sync_routes({route(VIP_A, "10.0.0.2"), route(VIP6_A, "2001:db8:1::2")})

    assert diff == RouteDiff(add=(route(VIP_A, "10.0.0.2"), route(VIP6_A, "2001:db8:1::2")))
    assert pop.ours() == {(VIP_A, "10.0.0.2", 10), (VIP6_A, "2001:db8:1::2", 10)}
    # And the kernel now forwards the VIPs toward the backbone next hop.
    assert "via 10.0.0.2 dev bb0" in pop.ip("route", "get", "198.51.100.10")
    assert "via 2001:db8:1::2 dev bb0" in pop.ip("-6", "route", "get", "2001:db8:ff::10")
    assert kernel.read_routes() == {route(VIP_A, "10.0.0.2"), route(VIP6_A, "2001:db8:1::2")}


def test_second_sync_with_the_same_set_changes_nothing(pop: Pop, kernel: KernelAdapter) -> None:
    desired = {route(VIP_A, "10.0.0.2"), route(VIP_B, "10.0.1.2"), route(VIP6_A, "2001:db8:1::2")}
    kernel.sync_routes(desired)
    before = pop.routes()

    assert kernel.sync_routes(desired) == RouteDiff()
    assert pop.routes() == before


def test_next_hop_change_replaces_the_route_in_place(pop: Pop, kernel: KernelAdapter) -> None:
    kernel.sync_routes({route(VIP_A, "10.0.0.2"), route(VIP6_A, "2001:db8:1::2")})

    diff = kernel.sync_routes({route(VIP_A, "10.0.1.2"), route(VIP6_A, "2001:db8:2::2")})

    assert diff == RouteDiff(replace=(
        RouteReplace(route(VIP_A, "10.0.0.2"), route(VIP_A, "10.0.1.2")),
        RouteReplace(route(VIP6_A, "2001:db8:1::2"), route(VIP6_A, "2001:db8:2::2")),
    ))
    # One route per VIP, the new next hop: no leftover, no IPv6 ECMP sibling.
    assert pop.ours() == {(VIP_A, "10.0.1.2", 10), (VIP6_A, "2001:db8:2::2", 10)}


def test_routes_no_longer_wanted_are_removed(pop: Pop, kernel: KernelAdapter) -> None:
    kernel.sync_routes(
        {route(VIP_A, "10.0.0.2"), route(VIP_B, "10.0.0.2"), route(VIP6_A, "2001:db8:1::2")}
    )

    diff = kernel.sync_routes({route(VIP_A, "10.0.0.2")})

    assert diff == RouteDiff(remove=(route(VIP_B, "10.0.0.2"), route(VIP6_A, "2001:db8:1::2")))
    assert pop.ours() == {(VIP_A, "10.0.0.2", 10)}
    assert "unreachable" not in pop.ip("route", "get", "198.51.100.10")


def test_routes_we_did_not_create_survive_even_for_the_same_prefix(
    pop: Pop, kernel: KernelAdapter
) -> None:
    # Same VIP: another protocol in main, our protocol in another table, and IPv6 too.
    # Their metric 5 sorts them before ours (10): a delete that did not name our
    # protocol, next hop and metric would hit them first.
    pop.ip("route", "add", VIP_A, "via", "10.0.1.2", "proto", "static", "metric", "5")
    pop.ip("route", "add", VIP_A, "via", "10.0.1.2", "proto", str(PROTO), "table", "100")
    pop.ip("-6", "route", "add", VIP6_A, "via", "2001:db8:2::2", "proto", "static", "metric", "5")
    foreign = pop.routes()

    kernel.sync_routes({route(VIP_A, "10.0.1.2"), route(VIP6_A, "2001:db8:2::2")})
    assert kernel.read_routes() == {route(VIP_A, "10.0.1.2"), route(VIP6_A, "2001:db8:2::2")}
    assert kernel.sync_routes(set()) == RouteDiff(
        remove=(route(VIP_A, "10.0.1.2"), route(VIP6_A, "2001:db8:2::2"))
    )

    assert pop.routes() == foreign
    assert kernel.read_routes() == set()


def test_routes_with_our_number_that_we_cannot_have_made_are_left_alone(
    pop: Pop, kernel: KernelAdapter
) -> None:
    # We never install multipath or link-local next hops; whoever did, it was not us.
    pop.ip("route", "add", VIP_B, "proto", str(PROTO), "metric", "10",
           "nexthop", "via", "10.0.0.2", "nexthop", "via", "10.0.1.2")
    pop.ip("-6", "route", "add", VIP6_B, "via", "fe80::2", "dev", "bb0", "proto", str(PROTO))
    before = pop.routes()

    diff = kernel.sync_routes({route(VIP_A, "10.0.0.2")})
    assert diff == RouteDiff(add=(route(VIP_A, "10.0.0.2"),))
    kernel.sync_routes(set())
    assert pop.routes() == before


def test_a_foreign_route_in_our_slot_fails_loudly_and_is_left_alone(
    pop: Pop, kernel: KernelAdapter
) -> None:
    # Same prefix, same metric: the kernel would let a `replace` take it over. We refuse.
    pop.ip("route", "add", VIP_A, "via", "10.0.0.2", "proto", "static", "metric", "10")
    pop.ip("-6", "route", "add", VIP6_A, "via", "2001:db8:1::2", "proto", "static", "metric", "10")
    foreign = pop.routes()

    with pytest.raises(KernelSyncError) as caught:
        kernel.sync_routes(
            {route(VIP_A, "10.0.1.2"), route(VIP6_A, "2001:db8:2::2"), route(VIP_B, "10.0.0.2")}
        )

    assert [f.errno for f in caught.value.failures] == [errno.EEXIST, errno.EEXIST]
    message = str(caught.value)
    assert "198.51.100.10/32 via 10.0.1.2" in message
    assert "2001:db8:ff::10/128 via 2001:db8:2::2" in message  # not an IPv6 ECMP sibling
    assert "File exists" in message and "not ours" in message
    assert caught.value.applied == RouteDiff(add=(route(VIP_B, "10.0.0.2"),))
    assert pop.routes() == foreign | {(254, VIP_B, "10.0.0.2", PROTO, 10)}


def test_an_unreachable_next_hop_fails_that_route_only(pop: Pop, kernel: KernelAdapter) -> None:
    desired = {
        route(VIP_A, "10.9.9.9"),  # no connected route to it
        route(VIP_B, "10.0.0.2"),
        route(VIP6_A, "2001:db8:9::2"),  # no connected route either
        route(VIP6_B, "2001:db8:1::2"),
    }
    with pytest.raises(KernelSyncError) as caught:
        kernel.sync_routes(desired)

    message = str(caught.value)
    assert "add route 198.51.100.10/32 via 10.9.9.9" in message
    assert "Network is unreachable" in message and "ENETUNREACH" in message
    # IPv6 says it differently: EHOSTUNREACH.
    assert "add route 2001:db8:ff::10/128 via 2001:db8:9::2" in message
    assert "No route to host" in message and "EHOSTUNREACH" in message
    assert {f.errno for f in caught.value.failures} == {errno.ENETUNREACH, errno.EHOSTUNREACH}
    installed = (route(VIP_B, "10.0.0.2"), route(VIP6_B, "2001:db8:1::2"))
    assert caught.value.applied == RouteDiff(add=installed)
    assert pop.ours() == {(VIP_B, "10.0.0.2", 10), (VIP6_B, "2001:db8:1::2", 10)}

    # Once the backbone link is there, the next level-based pass installs the rest.
    pop.ip("addr", "add", "10.9.9.8/29", "dev", "bb0")
    pop.ip("addr", "add", "2001:db8:9::1/64", "dev", "bb0", "nodad")
    assert kernel.sync_routes(desired) == RouteDiff(
        add=(route(VIP_A, "10.9.9.9"), route(VIP6_A, "2001:db8:9::2"))
    )


def test_a_restarted_agent_owns_the_routes_its_predecessor_left(pop: Pop) -> None:
    with KernelAdapter(protocol=PROTO, netns=pop.ns) as first:
        first.sync_routes({route(VIP_A, "10.0.0.2"), route(VIP_B, "10.0.0.2")})
    with KernelAdapter(protocol=PROTO, netns=pop.ns) as second:
        diff = second.sync_routes({route(VIP_A, "10.0.0.2")})
    assert diff == RouteDiff(remove=(route(VIP_B, "10.0.0.2"),))
    assert pop.ours() == {(VIP_A, "10.0.0.2", 10)}


def test_a_new_metric_setting_moves_our_routes_without_leftovers(pop: Pop) -> None:
    routes = (route(VIP_A, "10.0.0.2"), route(VIP6_A, "2001:db8:1::2"))
    with KernelAdapter(protocol=PROTO, netns=pop.ns, metric=10) as before:
        before.sync_routes(routes)
    with KernelAdapter(protocol=PROTO, netns=pop.ns, metric=30) as after:
        diff = after.sync_routes(routes)
        assert diff.add == diff.remove == routes
        assert after.sync_routes(routes) == RouteDiff()
    assert pop.ours() == {(VIP_A, "10.0.0.2", 30), (VIP6_A, "2001:db8:1::2", 30)}


def test_a_configured_table_keeps_main_untouched(pop: Pop) -> None:
    pop.ip("route", "add", VIP_A, "via", "10.0.0.2", "proto", str(PROTO), "metric", "10")
    main = pop.routes()
    with KernelAdapter(protocol=PROTO, table=1000, netns=pop.ns) as kernel:
        kernel.sync_routes({route(VIP_A, "10.0.1.2")})
        assert pop.routes() == main | {(1000, VIP_A, "10.0.1.2", PROTO, 10)}
        kernel.sync_routes(set())
    assert pop.routes() == main


def test_the_adapter_works_when_called_from_inside_an_event_loop(
    pop: Pop, kernel: KernelAdapter
) -> None:
    # The agent is asyncio; pyroute2's own sync API raises if called inside a running loop.
    async def agent_pass() -> tuple[RouteDiff, RouteDiff]:
        inline = kernel.sync_routes({route(VIP_A, "10.0.0.2")})
        threaded = await asyncio.to_thread(kernel.sync_routes, {route(VIP_B, "10.0.0.2")})
        return inline, threaded

    inline, threaded = asyncio.run(agent_pass())
    assert inline.add == (route(VIP_A, "10.0.0.2"),)
    assert threaded.add == (route(VIP_B, "10.0.0.2"),)
    assert threaded.remove == (route(VIP_A, "10.0.0.2"),)
    assert pop.ours() == {(VIP_B, "10.0.0.2", 10)}


def test_a_mistyped_namespace_fails_instead_of_being_created(pop: Pop) -> None:
    # pyroute2 creates a missing namespace by default; the agent would then "work" in it.
    missing = pop.ns.replace("-p", "-nope")
    with pytest.raises(KernelError, match=f"namespace '{missing}' does not exist"):
        KernelAdapter(netns=missing)
    assert missing not in sh("ip", "netns", "list")


def test_a_closed_adapter_refuses_work(pop: Pop) -> None:
    adapter = KernelAdapter(netns=pop.ns)
    adapter.close()
    with pytest.raises(KernelError, match="closed"):
        adapter.sync_routes({route(VIP_A, "10.0.0.2")})
    assert pop.ours() == set()


# --- loopback addresses ---------------------------------------------------------------------
A, B = ip_interface("198.51.100.10/32"), ip_interface("198.51.100.11/32")
A6 = ip_interface("2001:db8:ff::10/128")


def test_vip_addresses_go_on_lo_with_our_protocol_mark(pop: Pop, kernel: KernelAdapter) -> None:
    diff = kernel.sync_addresses({A, A6})

    assert diff == AddressDiff(add=(A, A6))
    marks = pop.lo_addresses()
    assert marks["198.51.100.10/32"] == PROTO and marks["2001:db8:ff::10/128"] == PROTO
    # The POP now answers for the VIP itself.
    assert pop.ip("route", "get", "198.51.100.10").startswith("local 198.51.100.10 dev lo")
    assert kernel.read_addresses() == {A, A6}
    assert kernel.sync_addresses({A, A6}) == AddressDiff()


def test_addresses_we_did_not_add_survive_even_when_wanted(pop: Pop, kernel: KernelAdapter) -> None:
    pop.ip("addr", "add", "198.51.100.50/32", "dev", "lo")
    pop.ip("addr", "add", "198.51.100.11/32", "dev", "lo")  # the operator put a VIP there by hand
    pop.ip("addr", "add", "2001:db8:ff::50/128", "dev", "lo")
    foreign = pop.lo_addresses()
    assert {"127.0.0.1/8", "::1/128"} <= foreign.keys()

    diff = kernel.sync_addresses({A, B, A6})
    assert diff == AddressDiff(add=(A, A6), not_ours=(B,))
    assert pop.lo_addresses()["198.51.100.11/32"] == 0  # not claimed

    assert kernel.sync_addresses(set()) == AddressDiff(remove=(A, A6))
    assert pop.lo_addresses() == foreign


def test_a_missing_loopback_interface_is_named(pop: Pop) -> None:
    with KernelAdapter(netns=pop.ns, loopback="anycast0") as kernel:
        with pytest.raises(KernelError, match="interface 'anycast0' not found"):
            kernel.sync_addresses({A})


def test_vip_addresses_no_longer_wanted_are_removed(pop: Pop, kernel: KernelAdapter) -> None:
    kernel.sync_addresses({A, B, A6})
    assert kernel.sync_addresses({B}) == AddressDiff(remove=(A, A6))
    ours = {addr for addr, mark in pop.lo_addresses().items() if mark == PROTO}
    assert ours == {"198.51.100.11/32"}
